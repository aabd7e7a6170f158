from kvmrun.cli import main

main()
