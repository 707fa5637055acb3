from smallfour.cli import main

main()
