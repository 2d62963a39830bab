"LLM Playground: a literate PyTorch library for training and sampling GPT-style Transformers on your own text."
__version__ = "0.0.1"

# Hand-written (nbdev does not overwrite it): importing the package registers the `${root:...}` resolver, so any
# config loaded after `import llm_playground` can use it.
from .config import register_resolvers as _register_resolvers
_register_resolvers()
