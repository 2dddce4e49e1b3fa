from gpen_video.cli import main

raise SystemExit(main())
