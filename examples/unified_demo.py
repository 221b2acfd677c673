"""The unified demo (``python -m loqjax.demo``): fine-tune adapters while serving traffic.

python examples/unified_demo.py [--model DIR] [--quick | --steps N] [--out DIR]
"""

from loqjax.demo import main

if __name__ == "__main__":
    main()
