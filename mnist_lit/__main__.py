"""python -m mnist_lit {fit,validate,test,predict} --config configs/default.yaml"""

import gc

if __name__ == "__main__":
    # Importing torch, Lightning and torchmetrics makes hundreds of thousands of objects, and the cyclic garbage
    # collector scans them over and over while they load, and once more at exit: a large part of a short run's
    # wall time (docs/benchmarks.md). It is paused for the imports, and what they made is frozen (module-level
    # objects live as long as the process anyway). Everything the run itself makes is collected as usual.
    gc.disable()
    from mnist_lit.cli import main

    gc.freeze()
    gc.enable()
    main()
