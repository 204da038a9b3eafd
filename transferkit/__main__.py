from transferkit.cli.main import main

main()
