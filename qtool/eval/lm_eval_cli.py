"""`lm_eval` with the qtool model registered and qtool's offline tasks on the include path.

lm-eval 0.4 finds models only in its own registry and has no plugin entry point, so the
plain `lm_eval` command cannot load `--model qtool`. This is that command, after
`import qtool.eval.harness`:

  python -m qtool.eval.lm_eval_cli --model qtool --model_args pretrained=CKPT,adapter=DIR \
      --tasks commonsense --limit 100 --device cpu

Arguments are lm_eval's own. `--tasks` takes qtool's task names (docs/eval.md); their files
are written to the qtool cache and passed as `--include_path` (lm-eval's built-in task of
the same name is shadowed: qtool's reads the offline data). HF_DATASETS_OFFLINE and
HF_HUB_OFFLINE are set unless already set.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> None:
    import qtool.eval.harness as harness
    from qtool.errors import QtoolError
    from qtool.eval.lm_tasks import expand, write_tasks

    harness.offline()
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        if "--tasks" in args and "--include_path" not in args:
            names = expand(args[args.index("--tasks") + 1].split(","))
            args += ["--include_path", str(write_tasks(names))]
    except QtoolError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    from lm_eval.__main__ import cli_evaluate

    sys.argv = ["lm_eval", *args]
    cli_evaluate()


if __name__ == "__main__":
    main()
