"""Install the annealing workbench: packages, Hydra configs, recipes, bundled data, console scripts."""
from setuptools import setup

setup(
    name="dots-anneal",
    version="0.1.0",
    description="Annealing workbench for large MoE language models (dots.llm1)",
    python_requires=">=3.10",
    # conf/ and recipes/ live at the repo top level (as the design card fixes it) and are
    # installed as the packages anneal.conf and anneal.recipes so `anneal` works from any folder.
    packages=["anneal", "anneal.model", "anneal.checkpoints", "anneal.parallel", "anneal.train", "anneal.evals",
              "anneal.conf", "anneal.recipes", "moe", "moe.kernels", "mixtures"],
    package_dir={"anneal.conf": "conf", "anneal.recipes": "recipes"},
    package_data={
        "anneal.conf": ["*.yaml", "*/*.yaml"],
        "anneal.recipes": ["*.yaml"],
        "anneal": ["assets/*/*"],
        "anneal.evals": ["tasks/*"],
        "mixtures": ["data/*", "mixtures/*.yaml"],
    },
    include_package_data=True,
    install_requires=[
        "torch>=2.4",
        "transformers>=5.0",
        "safetensors>=0.4",
        "tokenizers>=0.20",
        "huggingface_hub>=0.30",
        "hydra-core>=1.3.2",
        "omegaconf>=2.3",
        "wandb>=0.18",
        "datasets>=3.0",
        "rich>=13",
        "matplotlib>=3.7",
        "pyyaml>=6",
        "numpy>=1.24",
        "pyarrow>=15",
        "psutil>=5.9",
        "pydantic>=2.5",
    ],
    extras_require={
        # lm-evaluation-harness for anneal-eval; in `test` too, so CI runs the harness on a CPU export
        "eval": ["lm_eval[hf]>=0.4.9"],
        "test": ["pytest>=8", "lm_eval[hf]>=0.4.9"],
        "triton": ["triton>=3.1"],
        "bench": ["tiktoken>=0.7", "dashscope>=1.20"],  # the Qwen 151,643-token BPE for bench/bench_data.py
    },
    entry_points={
        "console_scripts": [
            "anneal=anneal.cli:main",
            "anneal-export=anneal.checkpoint_cli:export_main",
            "anneal-catalog=anneal.checkpoint_cli:catalog_main",
            "anneal-plot-schedule=anneal.cli:plot_schedule_main",
            "anneal-plan=anneal.cli:plan_main",
            "anneal-soup=anneal.checkpoint_cli:soup_main",
            "anneal-compare=anneal.checkpoint_cli:compare_main",
            "anneal-eval=anneal.cli:eval_main",
        ]
    },
)
