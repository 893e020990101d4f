from libs.common.migrate import run_env
from services.catalog.models import metadata

run_env(metadata)
