from libs.common.service import run_service
from services.authz.app import SPEC

run_service(SPEC)
