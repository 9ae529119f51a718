import sys

from stream_app.console import main

sys.exit(main())
