from luafcgid.cli import main

main()
