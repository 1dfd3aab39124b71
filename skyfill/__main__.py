from skyfill.cli import main

main()
