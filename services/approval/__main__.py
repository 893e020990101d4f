from libs.common.service import run_service
from services.approval.app import SPEC

run_service(SPEC)
