"""`python -m residscope.evaluate ...`: lm-evaluation-harness's command line with the "residscope" model registered."""

from residscope.model.errors import InputError

if __name__ == "__main__":
    try:
        from residscope.analyses.lm_eval_model import main
    except InputError as e:  # lm-eval not installed: one line, exit 2
        raise SystemExit(f"residscope.evaluate: error: {e}") from None
    main()
