from libs.common.migrate import run_env
from services.inference.models import metadata

run_env(metadata)
