-- wrk script: POST /sessions with a JSON body (a session on a work dir).
-- The work dir comes from the environment (WORK_DIR), set by http_load.sh.
-- wrk counts non-2xx answers itself ("Non-2xx or 3xx responses").
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"work_dir": "' .. (os.getenv("WORK_DIR") or "/tmp") .. '"}'
