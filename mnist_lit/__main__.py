"""python -m mnist_lit {fit,validate,test,predict} --config configs/default.yaml"""

if __name__ in ("__main__", "__mp_main__"):  # __mp_main__: a rank that ddp_spawn starts imports this file first
    import mnist_lit.preload  # noqa: F401  the imports, with the collector paused (mnist_lit/preload.py)

if __name__ == "__main__":
    from mnist_lit.cli import main

    main()
