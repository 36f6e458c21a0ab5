"""Launch the deepcovid web page (same as ``deepcovid serve``).

    python app.py                                  # --checkpoint best under ./checkpoints
    python app.py --checkpoint checkpoints/<run> --examples-dir ../shared/data/chest_xray/test/PNEUMONIA
    python app.py --help

Research use only — not a medical device. Importing this module loads no model and imports
neither torch nor gradio; everything heavy happens inside ``main()`` / ``build_demo()``.
"""

from deepcovid.webapp import build_demo, launch_kwargs, main  # noqa: F401  (light imports only)

if __name__ == "__main__":
    raise SystemExit(main(prog="app.py"))
