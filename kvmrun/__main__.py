from kvmrun.cli.quick import main

main()
