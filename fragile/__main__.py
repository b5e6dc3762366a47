from fragile.run.cli import main

main()
