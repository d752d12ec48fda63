from dsv4cli.cli import main

main()
