"""`python -m ember.cli`, the same as the `ember` script."""

from ember.cli import main

main()
