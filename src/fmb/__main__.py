from fmb.cli import main

main()
