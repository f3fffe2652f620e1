"""Talk to a trained model in the terminal, streaming tokens as they come.

    python -m launch.chat_cli -i sft                  # interactive; `clear` starts over, `quit` leaves
    python -m launch.chat_cli -i base -p "Why is the sky blue?"    # one answer, then exit

Loads the latest checkpoint of the stage (`-g` picks a run, `-s` a step). Each turn is rendered
as nanochat does: <|user_start|>text<|user_end|><|assistant_start|>, and the reply streams until
<|assistant_end|> (added if the model stops without it). Calculator calls run through the tool.
"""
import argparse
import sys

from nanochat_jax.engine import Engine
from nanochat_jax.loading import load_model


class StreamingDecoder:
    """Turns a growing token list into new text, holding back an incomplete UTF-8 character."""

    def __init__(self, tokenizer):
        self.tokenizer, self.tokens, self.shown = tokenizer, [], ""

    def push(self, token: int) -> str:
        self.tokens.append(token)
        text = self.tokenizer.decode(self.tokens)
        if text.endswith("\ufffd"):
            return ""
        new, self.shown = text[len(self.shown):], text
        return new


def reply(engine, tokenizer, conversation: list[int], args) -> list[int]:
    """Stream one assistant reply to stdout; the reply's tokens, ending with <|assistant_end|>."""
    end, bos = tokenizer.encode_special("<|assistant_end|>"), tokenizer.bos_id
    decoder, generated = StreamingDecoder(tokenizer), []
    for column, _ in engine.generate(conversation, num_samples=1, max_tokens=args.max_tokens,
                                     temperature=args.temperature, top_k=args.top_k, seed=args.seed):
        token = column[0]
        generated.append(token)
        if token in (end, bos):
            break
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    print()
    if not generated or generated[-1] != end:
        generated.append(end)
    return generated


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-i", "--source", default="sft", choices=("base", "mid", "sft", "rl"))
    parser.add_argument("-g", "--tag", default=None, help="run tag (default: the most recent of the stage)")
    parser.add_argument("-s", "--step", type=int, default=None)
    parser.add_argument("-t", "--temperature", type=float, default=0.6)
    parser.add_argument("-k", "--top-k", type=int, default=50)
    parser.add_argument("-m", "--max-tokens", type=int, default=256)
    parser.add_argument("-p", "--prompt", default=None, help="answer this one prompt and exit")
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    if args.temperature < 0 or args.top_k < 1 or args.max_tokens < 1:
        parser.error("need --temperature >= 0, --top-k >= 1 and --max-tokens >= 1")
    try:
        loaded = load_model(args.source, args.step, tag=args.tag)
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(str(err)) from None
    tok = loaded.tokenizer
    engine = Engine(loaded.graphdef, loaded.params, loaded.model_cfg, tok)
    user_start, user_end = tok.encode_special("<|user_start|>"), tok.encode_special("<|user_end|>")
    assistant_start = tok.encode_special("<|assistant_start|>")
    print(f"nanochat-jax: {args.source} model from {loaded.directory} (step {loaded.step}). "
          f"Type `clear` to start over, `quit` to leave.", file=sys.stderr)
    conversation = [tok.bos_id]
    while True:
        if args.prompt is not None:
            text = args.prompt
        else:
            try:
                text = input("\nUser: ").strip()
            except EOFError:
                break
            if text.lower() in ("quit", "exit"):
                break
            if text.lower() == "clear":
                conversation = [tok.bos_id]
                print("(conversation cleared)")
                continue
            if not text:
                continue
        turn = conversation + [user_start, *tok.encode(text), user_end, assistant_start]
        if len(turn) + args.max_tokens > loaded.model_cfg.sequence_len:
            print(f"(the conversation is {len(turn)} tokens; with {args.max_tokens} more it would not fit the "
                  f"model's {loaded.model_cfg.sequence_len}-token context: type `clear`)")
            if args.prompt is not None:
                return 1
            continue
        print("\nAssistant: ", end="", flush=True)
        conversation = turn + reply(engine, tok, turn, args)
        if args.prompt is not None:
            break
    return 0


if __name__ == "__main__":
    sys.exit(main())
