"""python -m mnist_lit {fit,validate,test,predict} --config configs/default.yaml"""

from mnist_lit.cli import main

if __name__ == "__main__":
    main()
