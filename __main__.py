from swarm.cli.app import main

main()
