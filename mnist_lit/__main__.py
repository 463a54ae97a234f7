"""python -m mnist_lit {fit,validate,test,predict} --config configs/default.yaml"""

if __name__ == "__main__":
    import mnist_lit.preload  # noqa: F401  the CLI's imports, with the collector paused (mnist_lit/preload.py)
    from mnist_lit.cli import main

    main()
