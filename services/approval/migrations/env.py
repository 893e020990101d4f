from libs.common.migrate import run_env
from services.approval.models import metadata

run_env(metadata)
