from contentdownload.cli.parser import main

raise SystemExit(main())
