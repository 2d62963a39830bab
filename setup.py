from configparser import ConfigParser
import setuptools
from setuptools import find_namespace_packages

assert setuptools.__version__ >= '36.2'

# Everything about the package is read from settings.ini (nbdev's single source of truth).
config = ConfigParser(delimiters=['='])
config.read('settings.ini', encoding='utf-8')
cfg = config['DEFAULT']

for key in 'version description keywords author author_email'.split():
    assert key in cfg, f'missing `{key}` in settings.ini'

statuses = ['1 - Planning', '2 - Pre-Alpha', '3 - Alpha', '4 - Beta', '5 - Production/Stable', '6 - Mature', '7 - Inactive']
py_versions = '3.10 3.11 3.12 3.13'.split()

requirements = cfg.get('requirements', '').split()
dev_requirements = cfg.get('dev_requirements', '').split()
# Optional integrations: every `<name>_requirements` key of settings.ini is the extra `<name>` (pip install -e ".[tensorboard]").
extras = {k[:-len('_requirements')]: cfg[k].split() for k in cfg if k.endswith('_requirements') and k != 'dev_requirements'}
extras = {k.replace('_', '-'): v for k, v in extras.items() if k}
min_python = cfg['min_python']
lib = cfg['lib_name']
console_scripts = [s.strip() for s in cfg.get('console_scripts', '').splitlines() if s.strip()]

setuptools.setup(
    name=cfg['repo'],
    license='Apache-2.0',
    classifiers=[
        'Development Status :: ' + statuses[int(cfg['status'])],
        'Intended Audience :: ' + cfg['audience'].title(),
        'Natural Language :: ' + cfg['language'].title(),
    ] + ['Programming Language :: Python :: ' + v for v in py_versions[py_versions.index(min_python):]],
    url=cfg['git_url'],
    packages=find_namespace_packages(include=[lib, lib + '.*']),
    package_data={lib: ['configs/*.yaml', 'configs/**/*.yaml', 'data/*']},
    include_package_data=True,
    install_requires=requirements,
    extras_require={**extras, 'dev': dev_requirements},
    python_requires='>=' + min_python,
    long_description=open('README.md', encoding='utf-8').read(),
    long_description_content_type='text/markdown',
    zip_safe=False,
    entry_points={'console_scripts': console_scripts, 'nbdev': [f'{lib}={lib}._modidx:d']},
    version=cfg['version'],
    description=cfg['description'],
    keywords=cfg['keywords'],
    author=cfg['author'],
    author_email=cfg['author_email'],
)
