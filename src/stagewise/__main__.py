from stagewise.cli import main

main()
