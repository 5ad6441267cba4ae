"""`python -m ember`, the same as the `ember` script."""

from ember.cli import main

main()
