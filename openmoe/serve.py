"""An OpenAI-compatible server for an OpenMoE folder: `transformers serve`, able to load it.

    openmoe-serve MODEL_DIR [--port 8000] [--continuous-batching] [...]   # or python -m openmoe.serve

takes every option of `transformers serve` (`/v1/completions`, `/v1/chat/completions` with
streaming, `/v1/models`, `/health`); the server, chat template, streaming and batching are
transformers'. What this module adds, and why:
- `transformers serve` resolves a model's class as `getattr(transformers, config.architectures[0])`,
  which finds only the architectures built into transformers, so no remote-code model loads
  (`AttributeError: module transformers has no attribute OpenMoeForCausalLM`). We make our class
  visible there.
- It answers some bad requests with a 500 (empty `messages`) or serves them (`max_tokens` past
  the model's positions). A check in front of the two generation routes answers those with a
  400 and a JSON error naming the field, as OpenAI's API does; a model name other than the one
  served gets a 404.
Stopping on `</s>` spelled as text comes from `OpenMoeForCausalLM.generate`, which finds the
folder's tokenizer.
"""

from __future__ import annotations

import json
import os
import sys

ROUTES = ("/v1/completions", "/v1/chat/completions")


def check_request(path: str, body, *, served: str, max_positions: int, count_tokens) -> tuple[int, str] | None:
    """(status, message) for a request the model cannot serve, None for a good one.
    `count_tokens(body)` gives the prompt's token count (chat template applied for chats)."""
    if not isinstance(body, dict):
        return 400, "the request body must be a JSON object"
    model = body.get("model")
    if model is not None and model != served and os.path.abspath(str(model)) != os.path.abspath(served):
        return 404, f"model {model!r} is not served here (this server serves {served!r})"
    if path.endswith("/chat/completions"):
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            return 400, "'messages' must be a non-empty list of {role, content} objects"
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or "content" not in m:
                return 400, f"messages[{i}] must be an object with 'role' and 'content'"
    elif not isinstance(body.get("prompt"), (str, list)):
        return 400, "'prompt' is required: a string or a list of strings"
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            return 400, f"'{key}' must be a positive integer, got {value!r}"
        try:
            n_prompt = count_tokens(body)
        except Exception as e:  # noqa: BLE001  (a prompt the template or tokenizer refuses)
            return 400, f"the prompt cannot be tokenised: {type(e).__name__}: {e}"
        if n_prompt + value > max_positions:
            return 400, (f"'{key}' {value} with a prompt of {n_prompt} tokens exceeds the model's "
                         f"{max_positions} positions")
    return None


def _token_counter(tokenizer):
    def count(body) -> int:
        if "messages" in body:
            return len(tokenizer.apply_chat_template(body["messages"], add_generation_prompt=True)["input_ids"])
        prompt = body.get("prompt", "")
        return max((len(tokenizer(p)["input_ids"]) for p in prompt), default=1) if isinstance(prompt, list) \
            else len(tokenizer(prompt)["input_ids"])
    return count


def _with_checks(build_server, served: str):
    """Wrap transformers' app builder: the same app with `check_request` in front."""
    from starlette.middleware.base import BaseHTTPMiddleware
    from starlette.responses import JSONResponse
    from transformers import AutoConfig, AutoTokenizer

    config = AutoConfig.from_pretrained(served, trust_remote_code=True)
    count = _token_counter(AutoTokenizer.from_pretrained(served, trust_remote_code=True))

    async def dispatch(request, call_next):
        if request.method == "POST" and request.url.path in ROUTES:
            raw = await request.body()  # starlette keeps it for the route
            try:
                body = json.loads(raw)
            except ValueError:
                bad = (400, "the request body is not valid JSON")
            else:
                bad = check_request(request.url.path, body, served=served,
                                    max_positions=config.max_position_embeddings, count_tokens=count)
            if bad:
                return JSONResponse({"error": {"message": bad[1], "type": "invalid_request_error",
                                               "code": bad[0]}}, status_code=bad[0])
        return await call_next(request)

    def build(*args, **kwargs):
        app = build_server(*args, **kwargs)
        app.add_middleware(BaseHTTPMiddleware, dispatch=dispatch)
        return app

    return build


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["-h"], ["--help"]):
        print("usage: openmoe-serve MODEL_DIR [options of `transformers serve`, listed by "
              "`transformers serve --help`]\n\n" + __doc__.split("\n\n", 1)[1])
        return 0
    if not argv or argv[0].startswith("-") or not os.path.isdir(argv[0]):
        print("usage: python -m openmoe.serve MODEL_DIR [transformers serve options]; "
              f"MODEL_DIR must be a model folder{f', not {argv[0]!r}' if argv else ''}", file=sys.stderr)
        return 2
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
        from transformers.cli import transformers as transformers_cli
        from transformers.cli.serving import server
    except ImportError as e:
        print(f"openmoe.serve: {e.name} is missing; install the serving extra: "
              f"pip install 'transformers[serving]'", file=sys.stderr)
        return 2
    import transformers

    from .modeling_openmoe import OpenMoeForCausalLM

    transformers.OpenMoeForCausalLM = OpenMoeForCausalLM  # what `transformers serve` looks up
    server.build_server = _with_checks(server.build_server, argv[0])
    if "--trust-remote-code" not in argv:
        argv.append("--trust-remote-code")  # the folder's config names our code (auto_map)
    sys.argv = ["transformers", "serve", *argv]
    return transformers_cli.main() or 0


if __name__ == "__main__":
    sys.exit(main())
