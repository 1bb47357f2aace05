from curvc.cli import main

main()
