from libs.common.service import run_service
from services.inference.app import SPEC

run_service(SPEC)
