from libs.common.migrate import run_env
from services.authz.models import metadata

run_env(metadata)
