import sys

if sys.argv[1:2] == ["doctor"]:  # before the rest of the CLI, which imports torch: it may SIGILL
    from wasi_tool.cli.doctor import main as doctor

    doctor()
else:
    from wasi_tool.cli.app import main

    main()
