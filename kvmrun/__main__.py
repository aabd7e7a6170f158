from kvmrun.cli.entry import main

main()
