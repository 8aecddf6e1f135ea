"""CPU dry run only (never on the GPU machine's PYTHONPATH): make the .venv look like the GPU
machine's image. Top-level modules of .venv distributions that are neither in the image's
package list (/work/.library/device/KINDS.md) nor in .devcheck/whl are marked absent
(None in sys.modules: `import` raises ModuleNotFoundError, importlib.util.find_spec gives None)."""
import os
import sys

BLOCKED = ['OpenGL', 'a2wsgi', 'adbc_driver_duckdb', 'aiosmtplib', 'aiosqlite', 'airflow', 'airflow_client', 'alembic', 'arf_training', 'argcomplete', 'arro3', 'arrow', 'asgiref', 'babel', 'blinker', 'cadwyn', 'cffi', 'colorlog', 'cron_descriptor', 'croniter', 'cryptography', 'daemon', 'dagfactory', 'deltalake', 'deprecated', 'dill', 'dns', 'docker', 'dotenv', 'duckdb', 'durationpy', 'email_validator', 'farama_notifications', 'fastapi_cli', 'flask', 'flask_cors', 'git', 'gitdb', 'glfw', 'graphene', 'graphql', 'graphql_relay', 'greenback', 'greenlet', 'grpc_health', 'grpc_reflection', 'grpc_tools', 'gunicorn', 'gymnasium', 'httptools', 'huey', 'importlib_resources', 'isoduration', 'itsdangerous', 'jsonschema', 'jsonschema_specifications', 'jwt', 'kubernetes', 'kubernetes_asyncio', 'kubernetes_validate', 'lazy_object_proxy', 'libcst', 'linkify_it', 'lockfile', 'mako', 'methodtools', 'msgspec', 'mujoco', 'multipart', 'natsort', 'oauthlib', 'optuna', 'outcome', 'pathlib_abc', 'pendulum', 'playwright', 'prettytable', 'pyasn1', 'pyasn1_modules', 'pycparser', 'pydantic_extra_types', 'pydantic_settings', 'pyflakes', 'pygtrie', 'python_multipart', 'referencing', 'requests_oauthlib', 'rich_argparse', 'rich_toolkit', 'rpds', 'setproctitle', 'skops', 'slugify', 'smmap', 'sniffio', 'sqlalchemy', 'structlog', 'svcs', 'tenacity', 'termcolor', 'text_unidecode', 'tools', 'tzdata', 'upath', 'uuid6', 'uvicorn', 'watchfiles', 'wcwidth', 'websocket', 'websockets', 'wirerope']

# Not blocked although the image's list lacks it: more_itertools (setuptools vendors it and puts
# its _vendor folder on sys.path; torch.compile's C++ build imports setuptools).
for _name in BLOCKED:
    sys.modules.setdefault(_name, None)

# DEVCHECK_BLOCK_EXTRA=mlflow,...: also mark these absent (to see what fails without them).
for _name in filter(None, os.environ.get("DEVCHECK_BLOCK_EXTRA", "").split(",")):
    sys.modules.setdefault(_name.strip(), None)
