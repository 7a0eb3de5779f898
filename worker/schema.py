"""SQLAlchemy Core metadata for every dms-worker table.

This is what the code's statements are built from. The DDL that DBAs apply lives in
``sql/migrations/<dialect>/``; ``tests/test_schema.py`` proves the two agree on each dialect.
Identifiers are unquoted lower case (Oracle stores them upper case). Timestamps are naive UTC.
"""
from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.dialects import oracle

metadata = sa.MetaData()

# DateTime becomes DATE on Oracle; the SPEC wants TIMESTAMP everywhere, in UTC.
Timestamp = sa.DateTime().with_variant(oracle.TIMESTAMP(), "oracle")
# SQLite only auto-generates keys for a column declared exactly INTEGER PRIMARY KEY.
Id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
Json = sa.Text()  # CLOB on Oracle, TEXT elsewhere; never compared in WHERE
Flag = sa.String(1)

# Request statuses
NEW, CLAIMED, PROCESSING = "NEW", "CLAIMED", "PROCESSING"
DONE, FAILED, CANCELLED = "DONE", "FAILED", "CANCELLED"
RUNNING_STATUSES = (CLAIMED, PROCESSING)
TERMINAL_STATUSES = (DONE, FAILED, CANCELLED)

# Request types
IMMEDIATE, HISTORY, STOP, REFRESH_SCHEDULE = "IMMEDIATE", "HISTORY", "STOP", "REFRESH_SCHEDULE"
CONTROL_TYPES = (STOP, REFRESH_SCHEDULE)
REQUEST_TYPES = (IMMEDIATE, HISTORY, STOP, REFRESH_SCHEDULE)

# DMS_PRCLOG statuses
IN_PROGRESS, COMPLETED, LOG_FAILED, STOPPED = "IP", "PC", "FL", "ST"

PARAM_COLUMNS = tuple(f"param{i}" for i in range(1, 11))

prcreq = sa.Table(
    "dms_prcreq", metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("mapref", sa.String(100), nullable=False),
    sa.Column("request_type", sa.String(30), nullable=False),
    sa.Column("payload", Json),
    sa.Column("status", sa.String(20), nullable=False),
    sa.Column("requested_at", Timestamp),
    sa.Column("claimed_at", Timestamp),
    sa.Column("claimed_by", sa.String(64)),
    sa.Column("completed_at", Timestamp),
    sa.Column("result_payload", Json),
    sa.Column("jobschid", Id),
    sa.Column("scheduled_for", Timestamp),
    # Design additions
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("not_before", Timestamp, nullable=False),
    # Set to mapref while a non-overlapping job runs; a unique index makes the database
    # refuse a second concurrent execution of that mapref (NULLs never collide).
    sa.Column("excl_key", sa.String(100)),
    sa.Column("stop_requested_at", Timestamp),
    # V003: queue controls. Higher priority is claimed first; a unique key is held by at most
    # one waiting or running request (a partial unique index).
    sa.Column("priority", sa.Integer, nullable=False),
    sa.Column("unique_key", sa.String(200)),
)

jobsch = sa.Table(
    "dms_jobsch", metadata,
    sa.Column("jobschid", Id, sa.Identity(), primary_key=True),
    sa.Column("mapref", sa.String(100), nullable=False),
    sa.Column("frqcd", sa.String(10)),
    sa.Column("frqdd", sa.String(10)),
    sa.Column("frqhh", sa.Integer),
    sa.Column("frqmi", sa.Integer),
    sa.Column("strtdt", Timestamp),
    sa.Column("enddt", Timestamp),
    sa.Column("schflg", Flag, nullable=False),
    sa.Column("curflg", Flag, nullable=False),
    sa.Column("dpnd_jobschid", Id),
    sa.Column("lst_run_dt", Timestamp),
    sa.Column("nxt_run_dt", Timestamp),
    sa.Column("misfire", sa.String(10), nullable=False),
    sa.Column("cronexp", sa.String(120)),
    sa.Column("params", Json),          # V002: per-schedule overrides, copied into each occurrence
    sa.Column("invalid_reason", sa.String(1000)),   # V003: why the leader skips this row
)

prclog = sa.Table(
    "dms_prclog", metadata,
    sa.Column("prcid", Id, sa.Identity(), primary_key=True),
    sa.Column("mapref", sa.String(100), nullable=False),
    sa.Column("strtdt", Timestamp, nullable=False),
    sa.Column("enddt", Timestamp),
    sa.Column("status", sa.String(2), nullable=False),
    sa.Column("msg", sa.String(4000)),
    sa.Column("sessionid", sa.String(64)),
    *(sa.Column(p, sa.String(250)) for p in PARAM_COLUMNS),
    sa.Column("request_id", sa.String(64)),
    sa.Column("worker_id", sa.String(64)),
    sa.Column("attempt", sa.Integer),
)

joblog = sa.Table(
    "dms_joblog", metadata,
    sa.Column("joblogid", Id, sa.Identity(), primary_key=True),
    sa.Column("prcdt", Timestamp),
    sa.Column("mapref", sa.String(100), nullable=False),
    sa.Column("srcrows", sa.BigInteger),
    sa.Column("trgrows", sa.BigInteger),
    sa.Column("errrows", sa.BigInteger),
    sa.Column("prcid", Id),
    sa.Column("sessionid", sa.String(64)),
    sa.Column("reccrdt", Timestamp),
)

joberr = sa.Table(
    "dms_joberr", metadata,
    sa.Column("errid", Id, sa.Identity(), primary_key=True),
    sa.Column("joblogid", Id),
    sa.Column("prcdt", Timestamp),
    sa.Column("errtyp", sa.String(30), nullable=False),
    sa.Column("errmsg", sa.String(4000)),
    sa.Column("dberrmsg", sa.String(4000)),
    sa.Column("keyvalue", sa.String(1000)),
    sa.Column("prcid", Id),
    sa.Column("mapref", sa.String(100)),
)

job = sa.Table(
    "dms_job", metadata,
    sa.Column("mapref", sa.String(100), primary_key=True),
    sa.Column("handler", sa.String(200), nullable=False),
    sa.Column("timeout_s", sa.Integer),
    sa.Column("max_attempts", sa.Integer, nullable=False),
    sa.Column("retry_delay_s", sa.Integer, nullable=False),
    sa.Column("allow_overlap", Flag, nullable=False),
    sa.Column("enabled", Flag, nullable=False),
    sa.Column("description", sa.String(4000)),
    sa.Column("params", Json),          # V002: JSON object of handler parameters (defaults)
    sa.Column("paused", Flag, nullable=False),      # V003: 'Y': its requests wait NEW
)

# V002: small per-job state kept by handlers across runs (e.g. an incremental export's watermark).
job_state = sa.Table(
    "dms_job_state", metadata,
    sa.Column("mapref", sa.String(100), primary_key=True),
    sa.Column("state_key", sa.String(100), primary_key=True),
    sa.Column("state_value", sa.String(4000)),
    sa.Column("updated_at", Timestamp),
)

worker = sa.Table(
    "dms_worker", metadata,
    sa.Column("worker_id", sa.String(64), primary_key=True),
    sa.Column("host", sa.String(255), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("started_at", Timestamp, nullable=False),
    sa.Column("heartbeat_at", Timestamp, nullable=False),
    sa.Column("version", sa.String(30)),
    sa.Column("is_leader", Flag, nullable=False),
    sa.Column("slots", sa.Integer),
    sa.Column("running", sa.Integer),
    sa.Column("metrics_port", sa.Integer),
    # V003: heartbeat plus this replica's own rescue window; rescuers go by it, not by theirs.
    sa.Column("expires_at", Timestamp),
)

leader = sa.Table(
    "dms_leader", metadata,
    sa.Column("name", sa.String(30), primary_key=True),
    sa.Column("holder", sa.String(64)),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("acquired_at", Timestamp),
    sa.Column("expires_at", Timestamp),
    sa.Column("mode", sa.String(10)),   # V003: 'lock' or 'lease'
)

schema_version = sa.Table(
    "dms_schema_version", metadata,
    sa.Column("version", sa.Integer, primary_key=True),
    sa.Column("description", sa.String(200), nullable=False),
    sa.Column("checksum", sa.String(64), nullable=False),
    sa.Column("applied_at", Timestamp, nullable=False),
)
