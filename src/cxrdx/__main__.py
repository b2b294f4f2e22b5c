from cxrdx.cli import main

raise SystemExit(main())
