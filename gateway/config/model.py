"""The settings' shape: every section and key with its type, default and help text.

Settings are data: every key has a type, a default and a help text (`msgspec.Meta(description=...)`);
`config/gateway.toml` lists them all and a test keeps it complete.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from gateway.forward import uplink_config

DEFAULT_CONFIG_PATH = Path("config/gateway.toml")
ENV_PREFIX = "GATEWAY_"
MiB = 1024 * 1024
GiB = 1024 * MiB


def _help(text: str, **constraints: Any) -> msgspec.Meta:
    return msgspec.Meta(description=text, **constraints)


class _Section(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerSettings(_Section):
    listen: Annotated[str, _help("HOST:PORT the HTTP server binds to.")] = "0.0.0.0:8080"
    upload_success_status: Annotated[
        Literal[200, 201], _help("Status of a successful upload: 201, or 200 for agents that insist.")
    ] = 201
    certfile: Annotated[str, _help("TLS certificate (PEM); TLS is on when certfile and keyfile are set.")] = ""
    keyfile: Annotated[str, _help("TLS private key (PEM).")] = ""
    external_url: Annotated[
        str,
        _help("The device base URL as devices on the LAN reach this gateway, e.g. http://gateway.lan:8080/api; "
              "given to provisioned devices as api_endpoint. Required with provisioning.mode = relay; in auto "
              "mode the URL a provisioning request came in on is used while it is empty."),
    ] = ""
    graceful_timeout_s: Annotated[
        float, _help("On SIGTERM, how long in-flight requests may take to finish.", ge=0)
    ] = 15.0
    read_timeout_s: Annotated[
        float, _help("A request body that sends nothing for this long is cut off (slow clients).", gt=0)
    ] = 30.0
    min_body_rate_bytes_per_s: Annotated[
        int,
        _help("A request body must also average this many bytes/s after the first read_timeout_s "
              "(a client trickling a byte a second is cut off); 0 = no rate floor.", ge=0),
    ] = 1024
    header_timeout_s: Annotated[
        float,
        _help("A client must finish a request's headers within this long of connecting (or of its previous "
              "answer); also how long an idle kept-alive connection is kept.", gt=0),
    ] = 10.0
    max_connections: Annotated[
        int,
        _help("Requests handled at once; one more gets 503 SERVICE_UNAVAILABLE with Retry-After at once, "
              "its body unread. Connections still sending headers are bounded by header_timeout_s.", ge=1),
    ] = 1000
    linger_s: Annotated[
        float,
        _help("After a refusal sent before the body was read (401, 403, 413, 429, 503, 507), how long the "
              "connection keeps discarding the client's body before it closes, so that a client that writes "
              "its whole body before reading still gets the answer.", ge=0),
    ] = 5.0
    linger_bytes: Annotated[
        int, _help("At most this many body bytes are discarded while lingering.", ge=0)
    ] = 64 * MiB


class DataSettings(_Section):
    dir: Annotated[str, _help("Folder for the catalog, the upload spool and folder storage.")] = "./data"
    catalog_threads: Annotated[
        int, _help("DuckDB worker threads. The catalog's writes are small statements, where 1 thread costs "
                   "about 18 % less CPU per upload than 2; more only speeds up large reads.", ge=1, le=64)
    ] = 1


class StorageSettings(_Section):
    backend: Annotated[
        Literal["folder", "minio"], _help("Where image bytes go: a local folder or MinIO/S3.")
    ] = "folder"
    orphan_grace_s: Annotated[
        int, _help("A stored object with no catalog row is removed by `verify --repair` once older than this.", ge=0)
    ] = 3600
    max_concurrent_large_puts: Annotated[
        int, _help("Uploads above 8 MiB stored at once; the S3 client buffers 5 MiB+ parts in memory.", ge=1)
    ] = 4


class MinioSettings(_Section):
    endpoint: Annotated[str, _help("HOST:PORT of the MinIO (or any S3) server; required for backend = minio.")] = ""
    access_key: Annotated[str, _help("S3 access key.")] = ""
    secret_key: Annotated[str, _help("S3 secret key.")] = ""
    bucket: Annotated[str, _help("Bucket for images and manifests; created when missing.")] = "acusight"
    secure: Annotated[bool, _help("Use HTTPS to reach the S3 server.")] = False
    region: Annotated[
        str, _help("S3 region the requests are signed for (so the client never asks the server for it).")
    ] = "us-east-1"
    sign_payload: Annotated[
        bool, _help("Over plain HTTP, sign each image's SHA-256 too (minio's own PUT in a worker thread, costs CPU); "
                    "off: presigned UNSIGNED-PAYLOAD PUTs from the event loop, as over HTTPS.")
    ] = False


class DedupSettings(_Section):
    scope: Annotated[
        Literal["gateway", "device"], _help("Duplicate images are detected across the whole gateway or per device.")
    ] = "gateway"
    on_duplicate: Annotated[
        Literal["reject", "accept"],
        _help("reject: 409 DUPLICATE_IMAGE; accept: 2xx with the existing image's ids."),
    ] = "reject"
    near_duplicates: Annotated[
        Literal["off", "keep", "hold", "reject"],
        _help("A frame nearly equal to a recent frame of its device: keep (store, forward, record the relation), "
              "hold (store, do not forward: outbox entry skipped), reject (409 NEAR_DUPLICATE_IMAGE); off: no "
              "fingerprints at all."),
    ] = "keep"
    near_max_distance: Annotated[
        int, _help("Largest difference-hash distance (bits of 64) between near-duplicates.", ge=0, le=64)
    ] = 12
    near_max_region_diff: Annotated[
        int, _help("Largest local difference (gray levels) between near-duplicates: a scratch or a moved part "
                   "exceeds it.", ge=0, le=255)
    ] = 30
    near_window: Annotated[
        int, _help("A frame is compared with this many recent distinct frames of its device.", ge=1, le=64)
    ] = 4
    near_window_s: Annotated[
        float, _help("...no older than this many seconds; so a changed scene is forwarded at least this often.", gt=0)
    ] = 60.0
    near_duplicates_include_annotated: Annotated[
        bool, _help("Hold or reject frames whose metadata carries annotations too (off: they always go through).")
    ] = False
    near_fingerprint_threads: Annotated[
        int, _help("Worker threads computing fingerprints; a frame arriving while 4 per thread are queued is "
                   "stored unchecked, so fingerprints never slow ingest down.", ge=1, le=16)
    ] = 1
    near_cpu_share: Annotated[
        float, _help("CPU (in cores) fingerprints may use on average; beyond it frames are stored unchecked. A JPEG "
                     "costs about half its full decode (docs/design.md).", gt=0, le=64)
    ] = 0.5
    near_min_idle_cores: Annotated[
        float, _help("Fingerprint only while the machine (or the container's CPU quota) has at least this many "
                     "cores idle, both lately (a fraction of a second) and over the last second: below it "
                     "ingest needs the CPU and frames are stored unchecked. Fingerprints' own CPU counts as "
                     "idle while they leave a quarter of this idle. At most half the CPUs; 0 = whatever "
                     "the load.", ge=0)
    ] = 1.0
    near_busy_uploads: Annotated[
        int, _help("While more uploads than this are in progress frames are stored unchecked too; 0 = no such "
                   "limit.", ge=0)
    ] = 0


class BatchSettings(_Section):
    max_images: Annotated[int, _help("A batch is sealed when it holds this many images.", ge=1)] = 1000
    timeout_s: Annotated[float, _help("A batch is sealed this long after it opened, upload or not.", gt=0)] = 1800.0


class CloudSettings(_Section):
    url: Annotated[str, _help("Cloud API base URL, e.g. https://acusight.io/api; empty: forwarding off.")] = ""
    timeout_s: Annotated[float, _help("Timeout of one request to the cloud (connect and each read).", gt=0)] = 30.0
    deadline_s: Annotated[
        float, _help("Longest one request to the cloud may take in all, answer included (plus the time a "
                     "bandwidth cap needs for its body).", gt=0)
    ] = 300.0
    proxy: Annotated[
        str, _help("HTTP proxy for every request to the cloud, e.g. http://proxy:3128; empty: HTTP_PROXY / "
                   "HTTPS_PROXY / NO_PROXY from the environment; \"direct\": none.")
    ] = ""
    verify_unknown_keys: Annotated[
        bool, _help("Check keys the gateway does not know against the cloud's GET /device/self.")
    ] = True
    organization_id: Annotated[
        str, _help("Organization reported to devices registered on the gateway (cloud-verified ones keep the cloud's).")
    ] = "local"
    accept_unknown_keys_offline: Annotated[
        bool, _help("While the cloud is unreachable, take unknown keys into quarantine instead of refusing them.")
    ] = False


class ForwardSettings(_Section):
    concurrency: Annotated[int, _help("Uploads to the cloud in flight at once.", ge=1, le=64)] = 4
    per_device_in_flight: Annotated[
        int,
        _help("Uploads of one device in flight at once; 1 keeps each device's strict upload order, "
              "more trades that order for throughput.", ge=1, le=64),
    ] = 1
    bandwidth_bytes_per_s: Annotated[int, _help("Upload bandwidth cap in bytes/s; 0 = unlimited.", ge=0)] = 0
    max_attempts: Annotated[
        int, _help("Failed attempts (retryable errors) before an entry is dead-lettered; 0 = never.", ge=0)
    ] = 100
    backoff_base_s: Annotated[float, _help("First retry delay; doubles per attempt, with full jitter.", gt=0)] = 1.0
    backoff_max_s: Annotated[float, _help("Longest retry delay.", gt=0)] = 300.0
    delete_after_days: Annotated[
        float, _help("Remove local bytes of delivered images after this many days; 0 = keep.", ge=0)
    ] = 0.0
    cache_bytes: Annotated[
        int,
        _help("Local disk kept for copies of images waiting for the cloud (object stores only), so the "
              "forwarder need not read them back from the store; 0 = off.", ge=0),
    ] = 4 * GiB
    timezone: Annotated[
        str, _help("Time zone of forward.windows, e.g. Europe/Berlin; empty: the system's.")
    ] = ""
    classes: Annotated[
        list[uplink_config.ForwardClass],
        _help("Priority classes ([[forward.classes]]: name, priority, always, match), first match wins; "
              "docs/uplink.md."),
    ] = msgspec.field(default_factory=list)
    windows: Annotated[
        list[uplink_config.ForwardWindow],
        _help("Sending windows ([[forward.windows]]: days, start, end, classes, bandwidth_bytes_per_s); none: "
              "send any time; docs/uplink.md."),
    ] = msgspec.field(default_factory=list)


class LimitSettings(_Section):
    max_image_bytes: Annotated[int, _help("Largest image accepted (413 above).", ge=1)] = 50 * MiB
    max_metadata_bytes: Annotated[int, _help("Largest metadata part accepted (413 above).", ge=1)] = 1 * MiB
    uploads_per_minute_per_device: Annotated[
        int, _help("Per-device upload rate limit (429 above); 0 = unlimited.", ge=0)
    ] = 0
    max_pending_bytes: Annotated[
        int, _help("Undelivered bytes held before new uploads get 507; 0 = unlimited.", ge=0)
    ] = 0
    min_free_disk_bytes: Annotated[
        int, _help("Free space kept on the data folder's disk; below it new uploads get 507.", ge=0)
    ] = 256 * MiB
    max_json_body_bytes: Annotated[
        int, _help("Largest JSON body of check-ins, admin and sync calls (413 above, checked while reading).", ge=1)
    ] = 1 * MiB
    unknown_key_checks_per_minute: Annotated[
        int,
        _help("Look-ups of unknown device keys at the cloud, gateway-wide (a token bucket); past it an "
              "unknown key gets 429 RATE_LIMITED with Retry-After.", ge=1),
    ] = 60
    max_quarantined_devices: Annotated[
        int,
        _help("Devices taken into quarantine while the cloud is unreachable (cloud.accept_unknown_keys_offline); "
              "past it a new unknown key gets 429 RATE_LIMITED with Retry-After.", ge=0),
    ] = 100


class ProvisioningSettings(_Section):
    mode: Annotated[
        Literal["auto", "relay", "local"],
        _help("How POST /api/devices/provision swaps a token for a key: relay (through the cloud's "
              "/devices/provision), local (tokens from `gateway tokens create`); auto: relay when cloud.url "
              "is set, else local."),
    ] = "auto"
    default_status: Annotated[
        Literal["pending", "approved"],
        _help("Status of a device provisioned locally (pending: a site admin approves it); also of a relayed "
              "one when the cloud's answer gives none."),
    ] = "pending"
    requests_per_minute_per_client: Annotated[
        int, _help("Provisioning requests per client address and minute (429 above); 0 = unlimited.", ge=0)
    ] = 10


class SyncSettings(_Section):
    token: Annotated[str, _help("Bearer token of cloud sync jobs; empty: sync API off.")] = ""


class AdminSettings(_Section):
    token: Annotated[
        str, _help("Bearer token of the admin API (the CLI uses it); empty: the one in token_file.")
    ] = ""
    token_file: Annotated[
        str,
        _help("File holding the admin token when `token` is empty: written (0600) with a new token on the "
              "server's first start, read by server and CLI alike; empty too: admin API off."),
    ] = "./secrets/admin.token"
    url: Annotated[
        str, _help("Where the CLI reaches a running server; empty: derived from server.listen.")
    ] = ""
    loopback_status_page: Annotated[
        bool,
        _help("Requests from 127.0.0.1/::1 may read the status page without the token; turn off where a "
              "reverse proxy or a container port mapping makes remote requests look local."),
    ] = True


class KeySettings(_Section):
    secret_file: Annotated[
        str,
        _help(
            "32-byte secret that encrypts device keys at rest; kept outside the data folder so that a "
            "copy of data/ holds no usable keys. Created on first start when missing."
        ),
    ] = "./secrets/gateway.key"


class LogSettings(_Section):
    level: Annotated[Literal["debug", "info", "warning", "error"], _help("Log level.")] = "info"
    format: Annotated[
        Literal["auto", "json", "text"], _help("json: one object per line; text: for people; auto: text on a terminal.")
    ] = "auto"


class Settings(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    server: ServerSettings = msgspec.field(default_factory=ServerSettings)
    data: DataSettings = msgspec.field(default_factory=DataSettings)
    storage: StorageSettings = msgspec.field(default_factory=StorageSettings)
    minio: MinioSettings = msgspec.field(default_factory=MinioSettings)
    dedup: DedupSettings = msgspec.field(default_factory=DedupSettings)
    batches: BatchSettings = msgspec.field(default_factory=BatchSettings)
    cloud: CloudSettings = msgspec.field(default_factory=CloudSettings)
    forward: ForwardSettings = msgspec.field(default_factory=ForwardSettings)
    limits: LimitSettings = msgspec.field(default_factory=LimitSettings)
    provisioning: ProvisioningSettings = msgspec.field(default_factory=ProvisioningSettings)
    sync: SyncSettings = msgspec.field(default_factory=SyncSettings)
    admin: AdminSettings = msgspec.field(default_factory=AdminSettings)
    keys: KeySettings = msgspec.field(default_factory=KeySettings)
    log: LogSettings = msgspec.field(default_factory=LogSettings)

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir)

    @property
    def listen_host_port(self) -> tuple[str, int]:
        host, _, port = self.server.listen.rpartition(":")
        return host.strip("[]"), int(port)

    @property
    def provisioning_mode(self) -> str:
        """`relay` or `local`, once `auto` is resolved."""
        mode = self.provisioning.mode
        return ("relay" if self.cloud.url else "local") if mode == "auto" else mode

    @property
    def admin_url(self) -> str:
        if self.admin.url:
            return self.admin.url.rstrip("/")
        host, port = self.listen_host_port
        if host in ("", "0.0.0.0", "::"):
            host = "127.0.0.1"
        scheme = "https" if self.server.certfile and self.server.keyfile else "http"
        return f"{scheme}://{host}:{port}"


SECRET_KEYS = {("minio", "secret_key"), ("minio", "access_key"), ("sync", "token"), ("admin", "token")}
# Settings naming files or folders: a relative value is taken from the settings file's folder.
PATH_KEYS = {("data", "dir"), ("keys", "secret_file"), ("admin", "token_file"), ("server", "certfile"),
             ("server", "keyfile")}
