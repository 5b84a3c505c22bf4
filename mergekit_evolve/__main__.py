from mergekit_evolve.cli import main

main()
