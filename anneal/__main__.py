"""`python -m anneal` == the `anneal` console script."""
from anneal.cli import main

if __name__ == "__main__":
    main()
