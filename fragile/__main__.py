from fragile.cli import main

main()
