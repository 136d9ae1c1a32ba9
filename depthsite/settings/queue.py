"""django-q2: the ORM broker by default, Redis when REDIS_URL is set; settings that cannot lose or duplicate work."""
from depthsite import env

# timeout < retry: a task is only handed out again after its worker must have given up on it, so a
# slow job is never run twice at once; max_attempts bounds re-deliveries of a job whose worker died.
_timeout = env.JOB_TIMEOUT
Q_CLUSTER = {
    # The Redis list / ORM queue key: deployments sharing one Redis need names of their own.
    "name": env.QUEUE_NAME,
    "workers": env.WORKERS,
    "timeout": _timeout,
    "retry": _timeout + 60,
    "max_attempts": env.JOB_MAX_ATTEMPTS,
    "recycle": 10_000,
    "max_rss": env.WORKER_MAX_RSS_KB,
    "queue_limit": max(2, env.WORKERS * 2),
    "ack_failures": True,
    "catch_up": False,
    "save_limit": 500,
    "label": "Task queue",
    # The ORM broker looks for new tasks this often (Redis wakes the cluster at once): a job waits half of
    # it on average. 0.2 s costs an idle cluster 10 ms of CPU a second here, against 7 at 0.5 s.
    "poll": 0.2,
}
if env.REDIS_URL:
    Q_CLUSTER["redis"] = env.REDIS_URL
else:
    Q_CLUSTER["orm"] = "default"
