"""SQLAlchemy tables (importing this package registers every table on Base.metadata)."""

from app.orm import guards as guards
from app.orm.api_keys import ApiKey, Role
from app.orm.audit import AdminAuditEntry
from app.orm.catalog import NDC_KEY_LENGTH, Product
from app.orm.costs import CostMatrixEntry, CostMatrixVersion
from app.orm.registry import Dataset, ModelPromotion, ModelVersion
from app.orm.state import ACTIVE_STATE_ID, ActiveState
from app.orm.training import JOB_STATUSES, TrainingJob
from app.orm.types import UTCDateTime, json_time, utcnow
from app.orm.verifications import Resolution, Verification

__all__ = [
    "ACTIVE_STATE_ID",
    "JOB_STATUSES",
    "NDC_KEY_LENGTH",
    "ActiveState",
    "AdminAuditEntry",
    "ApiKey",
    "CostMatrixEntry",
    "CostMatrixVersion",
    "Dataset",
    "ModelPromotion",
    "ModelVersion",
    "Product",
    "Resolution",
    "Role",
    "TrainingJob",
    "UTCDateTime",
    "Verification",
    "json_time",
    "utcnow",
]
