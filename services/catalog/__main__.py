from libs.common.service import run_service
from services.catalog.app import SPEC

run_service(SPEC)
