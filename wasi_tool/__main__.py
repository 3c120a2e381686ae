from wasi_tool.cli.app import main

main()
