from libs.common.service import run_service
from services.metering.app import SPEC

run_service(SPEC)
