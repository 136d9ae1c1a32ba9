"""depthsite's own settings: the weight cache, downloads, inference, uploads and the sign-in limits."""
from depthsite import env

DEPTHSITE_CACHE_DIR = env.CACHE_DIR
DEPTHSITE_CACHE_MAX_BYTES = env.CACHE_MAX_BYTES
DEPTHSITE_CACHE_FORMAT = env.CACHE_FORMAT
DEPTHSITE_NODE = env.NODE
DEPTHSITE_MODEL_MIRROR = env.MODEL_MIRROR
DEPTHSITE_OFFLINE = env.OFFLINE
DEPTHSITE_DOWNLOAD_TIMEOUT = env.DOWNLOAD_TIMEOUT
DEPTHSITE_ACCEPTED_LICENSES = env.ACCEPTED_LICENSES
DEPTHSITE_JOB_LEASE = env.JOB_LEASE

DEPTHSITE_DEVICE = env.DEVICE
DEPTHSITE_COMPILE = env.COMPILE
DEPTHSITE_FP16 = env.FP16
DEPTHSITE_RUNTIME = env.RUNTIME
DEPTHSITE_RUNTIME_BUILD = env.RUNTIME_BUILD
DEPTHSITE_WARM_MODELS = env.WARM_MODELS
DEPTHSITE_WARM_BYTES = env.WARM_BYTES
DEPTHSITE_PRELOAD = env.PRELOAD
DEPTHSITE_TORCH_THREADS = env.TORCH_THREADS
DEPTHSITE_MAX_IMAGE_PIXELS = env.MAX_IMAGE_PIXELS

DEPTHSITE_REUSE_RESULTS = env.REUSE_RESULTS
DEPTHSITE_MEDIA_STAGING = env.MEDIA_STAGING
DEPTHSITE_COUNT_QUERIES_DIR = env.COUNT_QUERIES_DIR
DEPTHSITE_MAX_UPLOAD_BYTES = env.MAX_UPLOAD_BYTES
DEPTHSITE_MAX_IMPORT_BYTES = env.MAX_IMPORT_BYTES
DEPTHSITE_BATCH_MAX_FILES = env.BATCH_MAX_FILES
DEPTHSITE_BATCH_MAX_BYTES = env.BATCH_MAX_BYTES
DEPTHSITE_PUBLIC_UPLOADS = env.PUBLIC_UPLOADS
DEPTHSITE_PUBLIC_STATUS = env.PUBLIC_STATUS
# How many reverse proxies append to X-Forwarded-For in front of the site (0: the header is never trusted).
DEPTHSITE_TRUSTED_PROXIES = env.TRUSTED_PROXIES
# Anonymous quotas, per browser session and per client address (an IPv6 /64 counts as one address).
DEPTHSITE_ANON_MAX_JOBS = env.ANON_MAX_JOBS
DEPTHSITE_ANON_MAX_BYTES = env.ANON_MAX_BYTES
# Seconds an anonymous job and its files are kept; a schedule deletes older ones.
DEPTHSITE_ANON_RETENTION = env.ANON_RETENTION

# Sign-in limits (depthsite.auth_limits), counted in the default cache: failed logins per (user name in any case,
# client address), per client address, and per user name from every address (higher: the one count a stranger
# can fill), at /accounts/login/ and /admin/login/; password-reset requests per e-mail address and per client
# address. Past one, the form answers 429 without checking the password or sending an e-mail.
# `manage.py signin_limits show|clear --user NAME --address ADDR` shows and clears the sign-in counts.
DEPTHSITE_LOGIN_RATE = env.LOGIN_RATE
DEPTHSITE_LOGIN_ADDRESS_RATE = env.LOGIN_ADDRESS_RATE
DEPTHSITE_LOGIN_USER_RATE = env.LOGIN_USER_RATE
DEPTHSITE_PASSWORD_RESET_RATE = env.PASSWORD_RESET_RATE
DEPTHSITE_PASSWORD_RESET_ADDRESS_RATE = env.PASSWORD_RESET_ADDRESS_RATE

# Uploads larger than this spill to a temporary file instead of memory.
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1000**2
DATA_UPLOAD_MAX_MEMORY_SIZE = 5 * 1000**2
