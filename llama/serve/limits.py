"""The server's limits and their defaults, in one place (no imports: the command line reads them before it
loads FastAPI or uvicorn). README's "Limits and security" lists them."""

MAX_BODY_BYTES = 1 << 20  # a request body at most (--max_body_bytes); beyond: 413
BODY_TIMEOUT = 30.0  # seconds a request body may take to arrive in full (--body_timeout); beyond: 408
HEADER_TIMEOUT = 10.0  # seconds a request's head may take to arrive (--header_timeout); then the socket closes
KEEP_ALIVE_TIMEOUT = 5  # seconds an idle connection stays open between requests
MAX_CONNECTIONS = 256  # open connections and requests in progress at most (--max_connections); beyond: 503
MAX_HEAD_BYTES = 16 * 1024  # a request's line and headers at most; beyond: 400
AUTH_DELAY = 0.25  # seconds before a wrong or missing API key is answered (awaited: nobody else waits)
MAX_PREFILL_TOKENS = 512  # prompt tokens one step prefills at most (--max_prefill_tokens; the first always goes)
MAX_QUEUE = 64  # requests waiting for a row at most (--max_queue); beyond: 429
MAX_PROMPTS = 64  # prompts one completion request may list at most (each takes a row or a queue place)
MAX_CHOICES = 8  # choices (`n`) one request may ask for; each takes a cache row, so also at most max_batch_size
MAX_STOP = 4  # stop strings one request may give (OpenAI's limit)
MAX_STOP_CHARS = 1000  # characters of one stop string at most
MAX_CLIENT_CONNECTIONS = 64  # open connections from one client address at most (--max_client_connections)
RESERVED_CONNECTIONS = 8  # beyond max_connections, connections that may only ask GET /health or /metrics
PROBE_TIMEOUT = 2.0  # seconds such a connection's request head may take to arrive
LOG_EVERY = 10.0  # seconds between two log lines of one cause (the rest are counted, then summed up)
