"""``python -m tools.bench``: see the package docstring."""
from tools.bench import main

main()
